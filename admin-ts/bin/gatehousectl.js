#!/usr/bin/env node
// Runs gatehousectl from its TypeScript source (tsx compiles it on the fly).
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/gatehousectl.ts');
