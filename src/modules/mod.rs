//! Host modules scripts reach: kv, userspace, lookup, send, fetch (implementations of `script::HostModule`).
