//! Harness for the workspace integration tests.
