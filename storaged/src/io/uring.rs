//! The io_uring implementation of BlockIo. (stub)
