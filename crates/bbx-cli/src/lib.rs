//! bbx-cli
