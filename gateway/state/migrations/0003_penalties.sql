-- Placeholder (cluster branch): keeps the numbering 1..n while the branch that owns
-- this number has not been merged; that branch's file replaces this one.
SELECT 1;
