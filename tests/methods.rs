//! Integration tests: methods.
