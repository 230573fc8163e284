//! bbx-server
