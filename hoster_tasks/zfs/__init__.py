"""The ZFS layer: argv builders (commands), output parsers (parse), shells (local and SSH), capability probe."""
