"""Agents on the mesh: the local node they talk to, and launchers for agent tools."""
