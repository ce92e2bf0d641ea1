"""The paper's experiments: Table I and Figs. 1-5 (:mod:`.table1`, :mod:`.figures`), the
detectors of Tables II and III (:mod:`.detect`) and the 2-D toy of Fig. 6 (:mod:`.toy`)."""
