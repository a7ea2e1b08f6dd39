"""medusa_toolkit.model: The Medusa model: the frozen base, the heads (and every on-disk layout of them), MedusaModel, the tree."""
