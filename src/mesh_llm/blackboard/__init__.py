"""The blackboard: short notes agents on the mesh leave for each other (SPEC F20)."""
