//! The simulated, fault-injecting implementation of BlockIo. (stub)
