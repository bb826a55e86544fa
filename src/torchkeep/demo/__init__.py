"""The demo: the seed articles' story on shipped data, with its reference models. Not the library."""
