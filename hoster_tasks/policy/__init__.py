"""Pure decisions (no I/O): retention and replication planning. `now` is passed in, never read."""
