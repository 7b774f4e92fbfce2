"""Qt widgets: thin views over the compute core."""
