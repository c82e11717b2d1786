//! (flight: in progress)
