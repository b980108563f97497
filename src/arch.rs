//! Architecture from tensor names: which tensors are pre-layer (embeddings), which belong to
//! decoder/encoder layer `i`, which are post-layer (final norm, head); the layer count from
//! config.json; tied embeddings.

/// Where a tensor sits in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    Pre,
    Layer(usize),
    Post,
}
