//! bitstack-sort (being written).
