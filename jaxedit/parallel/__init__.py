"""Parallelism: meshes and the logical-axis rule table (`sharding`), multi-host start-up (`distributed`)."""
