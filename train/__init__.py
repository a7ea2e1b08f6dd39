"""medusa_toolkit.train"""
