"""Tools for testing explanations: a zoo of tiny offline models (:mod:`.zoo`) and a diagnostic that recovers every
forward value the Promise System can (:func:`.recover.recover_all`)."""
