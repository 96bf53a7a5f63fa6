//! The in-process engine: load a model, submit requests, stream token events.
