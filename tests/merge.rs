//! Integration tests: merge.
