"""The start-up steps of a node, one module each, found by `startup.discover()`."""
