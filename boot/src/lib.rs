//! Host tool (being written).
