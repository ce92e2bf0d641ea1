"""Applications that use the attacks at scale: ``generate`` (adversarial datasets) and
``bench`` (timing against the floor and the peers), with the attack registry they share
(:mod:`.specs`)."""
