//! The worker gRPC service wrapping the engine handle.
