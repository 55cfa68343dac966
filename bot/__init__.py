"""The conversation: one call's turn taking, understanding, decisions and answers; the `bot` CLI."""
