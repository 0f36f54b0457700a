"""What operators watch: Sentry, metrics, status, error files."""
