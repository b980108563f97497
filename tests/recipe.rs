//! Integration tests: recipe.
