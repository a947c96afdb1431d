//! bitstack-linalg (being written).
