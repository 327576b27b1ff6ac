"""The pieces methods synthesise with: generators, CEND, the memory bank, augment, losses."""
