"""The blackboard: short posts shared with every member and client of the mesh (SPEC F20)."""
