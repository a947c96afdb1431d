//! examples (being written).
