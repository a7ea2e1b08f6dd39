"""medusa_toolkit.export"""
