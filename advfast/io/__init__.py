"""What attacks read and write: models (:mod:`.models`), datasets (:mod:`.datasets`), which
inputs to attack with which targets (:mod:`.selection`), durable files and output folders
(:mod:`.files`), generate's shards (:mod:`.shards`) and their reader (:mod:`.reader`)."""
