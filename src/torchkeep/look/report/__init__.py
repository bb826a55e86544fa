"""The HTML report: data (prepare), page (render, with svg), writer (write atomically)."""
