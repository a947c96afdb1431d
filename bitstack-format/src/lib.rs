//! bitstack-format (being written).
