//! bitstack-cuda (being written).
