"""Finding meshes: public listings (pure, listing.py) published to and read from Nostr relays (nostr.py)."""
