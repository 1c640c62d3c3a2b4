//! Opening a device: raw block device or preallocated regular file. (stub)
