"""Read any checkpoint safely: formats, the restricted unpickler, the scanner, key and tree helpers.

Never imports carry, keep or look."""
