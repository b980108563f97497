//! Plan → execute: a recipe becomes a list of output tensors with resolved inputs and parameters;
//! execution merges them in parallel (rayon) into a sink — a shard writer on disk, or a map in
//! memory for search candidates.
