// Layout of a subtask DAG for drawing: each subtask in the column of its longest dependency chain.
export interface Placed {
  name: string;
  column: number;
  row: number;
}

export function layout(nodes: { name: string; dependencies: string[] }[]): Placed[] {
  const byName = new Map(nodes.map((n) => [n.name, n]));
  const depth = new Map<string, number>();
  const visiting = new Set<string>();
  const visit = (name: string): number => {
    const known = depth.get(name);
    if (known !== undefined) return known;
    if (visiting.has(name)) return 0; // the server refuses cycles; never loop on bad data anyway
    visiting.add(name);
    const deps = byName.get(name)?.dependencies.filter((d) => byName.has(d)) ?? [];
    const d = deps.length ? Math.max(...deps.map(visit)) + 1 : 0;
    visiting.delete(name);
    depth.set(name, d);
    return d;
  };
  const rows = new Map<number, number>();
  return nodes.map((n) => {
    const column = visit(n.name);
    const row = rows.get(column) ?? 0;
    rows.set(column, row + 1);
    return { name: n.name, column, row };
  });
}
