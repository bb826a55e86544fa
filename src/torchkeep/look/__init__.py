"""Look at whole checkpoints: diff, convert, consolidate, streaming statistics, the HTML report."""
