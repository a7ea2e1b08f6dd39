"""The toolkit's version, written into every artefact it produces."""

__version__ = "0.1.0"
