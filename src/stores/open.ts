/**
 * Opens the counter store the config asks for: Redis (REDIS_URL), SQLite (STATE_PATH) or memory.
 *
 * @module
 */

import type { RelayConfig } from "../config/variables.ts";
import type { CounterStore } from "./counter.ts";
import { FallbackCounterStore } from "./fallback.ts";
import { MemoryCounterStore } from "./memory.ts";
import { RedisCounterStore } from "./redis.ts";
import { SqliteCounterStore, type ThreadLock } from "./sqlite.ts";
import { errorText } from "../text.ts";

/**
 * The store the configuration asks for: SQLite at STATE_PATH, Redis at REDIS_URL (with the in-memory fallback), or
 * memory. A SQLite file that cannot be opened is an error naming STATE_PATH.
 */
export async function openCounterStore(
  config: RelayConfig,
  onChange: (state: "ok" | "degraded", error?: string) => void = () => {},
  lock?: ThreadLock,
): Promise<CounterStore | { error: string }> {
  if (config.statePath !== undefined) {
    try {
      return await SqliteCounterStore.open(config.statePath, Date.now, config.usageRetentionDays, lock);
    } catch (error) {
      return {
        error: `STATE_PATH names "${config.statePath}", which cannot be opened and written as a SQLite file (${
          errorText(error).slice(0, 200)
        }); use a writable path such as /data/state.db`,
      };
    }
  }
  if (config.redisUrl !== undefined) {
    const shared = await RedisCounterStore.connect(config.redisUrl, Date.now, config.usageRetentionDays);
    return new FallbackCounterStore(shared, new MemoryCounterStore(Date.now, config.memoryStoreKeys), onChange);
  }
  return new MemoryCounterStore(Date.now, config.memoryStoreKeys);
}
