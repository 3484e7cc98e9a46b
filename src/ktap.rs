//! KTAP output.
