"""The `hoster-tasks` command line."""
