"""Blackboard items are signed by the node that posts them, with the Ed25519 key whose public
half is its node id (iroh's own keys), so nobody can post in another node's name: a peer that
passes items on cannot change them, and one that makes them up can only sign as itself."""

from __future__ import annotations

from collections.abc import Callable

import iroh

from mesh_llm.blackboard.board import Item


def signer(secret_key: bytes) -> Callable[[str], str]:
    key = iroh.SecretKey.from_bytes(secret_key)
    return lambda item_id: bytes(key.sign(item_id.encode()).to_bytes()).hex()


def verify_item(item: Item) -> bool:
    """Is the item's signature its node's, over its id (which hashes everything else in it)?"""
    try:
        node = iroh.EndpointId.from_bytes(bytes.fromhex(item.node))
        node.verify(item.id.encode(), iroh.Signature.from_bytes(bytes.fromhex(item.sig)))
    except (iroh.IrohError, ValueError):
        return False
    return True
