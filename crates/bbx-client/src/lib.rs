//! bbx-client
