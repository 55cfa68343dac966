"""`bot` subcommand groups, one module each."""
