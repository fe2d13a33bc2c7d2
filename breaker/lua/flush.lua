-- flush: send the counts the caller batched; the state machine does not move.
-- status 1: counted; 0: the circuit's keys are gone, so the counts were dropped and nothing
-- was written (a flush never creates a circuit).
if not c.state then return {0} end
begin()
return reply(1)
